"""Stage 1 of the flow, model -> ModelGraph.

``capture(model, example_inputs)`` traces the user's model (torch.fx.symbolic_trace, then
torch.export non-strict, then block by block), propagates FakeTensors through the graph
for per-node shapes, bytes and FLOPs (``_fake``), and names the repeated blocks that the
passes act on. It never changes the user's model.
"""

from autoscale.capture._capture import BlockInfo, ModelGraph, NodeMeta, capture, find_blocks

__all__ = ["BlockInfo", "ModelGraph", "NodeMeta", "capture", "find_blocks"]

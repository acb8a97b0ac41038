"""Measured trials in worker processes: a crash, hang or out-of-memory fails one trial.

Note: [isolated trials]
A trial runs real training steps with rewritten models and native kernels, so it can
segfault, hang, exhaust memory or raise. Each runs in a worker process that the tuner
talks to over a socket pair, with a time limit per task: when the worker dies (a
signal, the OS out-of-memory killer) or stays silent past the limit, the tuner kills it,
marks that trial failed with the reason and starts a fresh worker for the next one.

- The worker is a fresh interpreter (``subprocess``, not ``multiprocessing``): spawn
  would re-run the user's ``__main__`` without an ``if __name__`` guard, and fork would
  copy a process with live OpenMP threads. It removes the current folder from sys.path
  before importing autoscale, so a source checkout cannot shadow the installed package.
- The workload reaches it by re-importing the user's script (``autoscale tune SCRIPT``)
  or by unpickling the model, inputs and loss function that the Python API saved with
  torch.save (pickle_module=cloudpickle, which also carries classes and lambdas defined
  in ``__main__`` or a notebook). The worker captures the model itself and checks that
  its fingerprint equals the tuner's, so both measure the same model.
- A worker is reused after a trial that succeeded (its process state is that of a
  training job that ran a few steps: kernel choices cached, memory freed) and replaced
  after any failure, whose state cannot be trusted.
- It keeps the pristine model on the CPU and moves each trial's copy to the device, so
  on CUDA the budget covers what the trial itself holds, as on the CPU, where the
  tracker counts only the trial's tensors.
- It ignores SIGINT and runs in its own session: Ctrl-C reaches the tuner, which stops
  its worker and leaves the study as it was after the last finished trial. It also dies
  with the tuner (PR_SET_PDEATHSIG on Linux, EOF on its socket elsewhere).

Note: [multi-rank trials]
A plan for N ranks is measured as a real N-process job: N workers, each a rank of one
torch.distributed process group (gloo on CPU over loopback, NCCL on CUDA with a GPU per
rank), on a fresh TCP port per worker set. Every task goes to all ranks; each trains on
its own 1/N of the example batch (the global batch) and measures its own step. The
trial's figures are the job's: the slowest rank's step time, the global batch over it as
throughput, and the largest rank's peak memory, since the budget is per device. When one
rank dies or raises, the others would wait on it in a collective forever, so the whole
set is killed and restarted, as one worker is after a failure. On CPU each rank gets
``cores // N`` OpenMP threads unless OMP_NUM_THREADS is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from autoscale.errors import TunerError
from autoscale.measure import Measurement
from autoscale.plan import OptimizerPlan, Plan
from autoscale.runtime._batch import Batch, LossFn

__all__ = [
    "InProcessRunner", "RankNetwork", "TrialFailed", "TrialRunner", "WorkerRunner",
    "pickle_workload", "script_workload",
]  # fmt: skip

# Import torch, autoscale and the user's script, and capture the model: seconds, more
# for a big HuggingFace model on a loaded machine.
_START_TIMEOUT_S = 600.0


class TrialFailed(TunerError):
    """A measured trial did not produce a measurement; ``reason`` says why, in one line."""

    def __init__(self, reason: str, *, kind: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        """'error' (an exception), 'crash' (a signal), 'timeout', 'oom'."""


@dataclass(frozen=True)
class WorkloadSource:
    """How a worker gets the model: re-import a script, or unpickle a saved file."""

    kind: Literal["script", "pickle"]
    path: str


def script_workload(path: str | os.PathLike[str]) -> WorkloadSource:
    """The workload script whose ``build()`` returns the model being tuned."""
    return WorkloadSource("script", str(Path(path).resolve()))


def pickle_workload(model: nn.Module, batch: Batch, loss_fn: LossFn | None,
                    folder: str | os.PathLike[str]) -> WorkloadSource:
    """Save model, batch and loss function into ``folder`` for workers to load.

    Raises TunerError naming the fix when they cannot be serialized.
    """
    import cloudpickle

    path = Path(folder) / "workload.pt"
    try:
        torch.save({"model": model, "batch": batch, "loss_fn": loss_fn}, path,
                   pickle_module=cloudpickle)
    except Exception as err:
        path.unlink(missing_ok=True)
        raise TunerError(
            f"the model, example inputs or loss_fn cannot be serialized for the tuner's "
            f"worker processes ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "Put the model in a workload script and run `autoscale tune SCRIPT`, or pass "
            "isolate=False to measure trials in this process (no crash isolation)."
        ) from err
    return WorkloadSource("pickle", str(path))


@dataclass(frozen=True)
class _Task:
    kind: Literal["baseline", "plan", "link", "curve"]
    plan: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    nbytes: int = 0
    steps: int = 0


class TrialRunner:
    """Measures the baseline and plans; a failure raises TrialFailed and nothing else."""

    def baseline(self, optimizer: OptimizerPlan, *, timeout_s: float | None = None
                 ) -> Measurement:  # fmt: skip
        raise NotImplementedError

    def measure(self, plan: Plan, *, timeout_s: float | None = None) -> Measurement:
        raise NotImplementedError

    def curve(self, plan: Plan, steps: int, *, timeout_s: float | None = None
              ) -> list[float]:  # fmt: skip
        """The loss of each of ``steps`` steps of ``plan`` from the pristine model (across
        ranks: the mean of the ranks' losses, each on its share)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop whatever the runner started; safe to call twice."""

    def __enter__(self) -> TrialRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessRunner(TrialRunner):
    """``isolate=False``: trials run in this process (for debugging; no time limit and
    no protection against crashes, only against exceptions)."""

    def __init__(self, model: nn.Module, batch: Batch, *, loss_fn: LossFn | None,
                 graph: object, warmup: int, iters: int) -> None:
        self._model, self._batch, self._loss_fn = model, batch, loss_fn
        self._graph, self._warmup, self._iters = graph, warmup, iters
        self._froze = False

    def __enter__(self) -> InProcessRunner:
        from autoscale.search._trial import freeze_long_lived

        # Until close(): Note: [a collection walks only what trials make].
        self._froze = freeze_long_lived()
        return self

    def close(self) -> None:
        from autoscale.search._trial import thaw

        thaw(self._froze)
        self._froze = False

    def baseline(self, optimizer: OptimizerPlan, *, timeout_s: float | None = None
                 ) -> Measurement:  # fmt: skip
        from autoscale.search._trial import measure_baseline

        return self._guard(lambda: measure_baseline(
            self._model, self._batch, loss_fn=self._loss_fn, optimizer=optimizer,
            warmup=self._warmup, iters=self._iters))

    def measure(self, plan: Plan, *, timeout_s: float | None = None) -> Measurement:
        from autoscale.search._trial import measure_plan

        return self._guard(lambda: measure_plan(
            plan, self._model, self._batch, loss_fn=self._loss_fn, graph=self._graph,
            warmup=self._warmup, iters=self._iters))

    def curve(self, plan: Plan, steps: int, *, timeout_s: float | None = None
              ) -> list[float]:  # fmt: skip
        from autoscale.search._trial import loss_curve

        try:
            return loss_curve(plan, self._model, self._batch, loss_fn=self._loss_fn,
                              graph=self._graph, steps=steps)
        except Exception as err:
            raise TrialFailed(_describe(err), kind=_kind(err)) from err

    @staticmethod
    def _guard(run: Callable[[], Measurement]) -> Measurement:
        from autoscale.search._trial import free_memory

        try:
            return run()
        except Exception as err:  # isolation from exceptions: this trial fails alone
            free_memory(collect=True)
            raise TrialFailed(_describe(err), kind=_kind(err)) from err


@dataclass(frozen=True)
class RankNetwork:
    """Where each rank of a multi-rank trial runs on the network: rank r's command starts
    with ``prefixes[r]`` (e.g. ``ip netns exec ns0``), gloo binds to ``ifnames[r]``, and
    the ranks meet at ``master_addr``. The default is every rank on loopback; the
    bandwidth benchmark runs ranks as two hosts joined by a shaped link."""

    prefixes: tuple[tuple[str, ...], ...]
    ifnames: tuple[str, ...]
    master_addr: str


class WorkerRunner(TrialRunner):
    """Trials in worker processes, one per rank (``world_size`` of them), restarted after any
    failure. See Note: [isolated trials] and Note: [multi-rank trials]."""

    def __init__(self, source: WorkloadSource, *, device: torch.device, fingerprint: str,
                 warmup: int, iters: int, world_size: int = 1,
                 start_timeout_s: float = _START_TIMEOUT_S,
                 network: RankNetwork | None = None) -> None:
        self._init = {"source": dataclasses.asdict(source), "device": str(device),
                      "warmup": warmup, "iters": iters, "sys_path": list(sys.path),
                      "fingerprint": fingerprint, "world_size": world_size,
                      "master_addr": network.master_addr if network else "127.0.0.1"}
        if network is not None and not (len(network.prefixes) == len(network.ifnames)
                                        == world_size):
            raise TunerError(f"RankNetwork names {len(network.prefixes)} prefixes and "
                             f"{len(network.ifnames)} interfaces for {world_size} ranks; "
                             "give one of each per rank.")
        self._network = network
        self.world_size = world_size
        self._start_timeout_s = start_timeout_s
        self._ranks: list[_Worker] = []
        self.started = 0
        """Worker sets started so far (the first, and one after each failure)."""

    def baseline(self, optimizer: OptimizerPlan, *, timeout_s: float | None = None
                 ) -> Measurement:  # fmt: skip
        from autoscale.plan._fields import to_json_value

        return self._run(_Task("baseline", optimizer=to_json_value(optimizer)), timeout_s)

    def measure(self, plan: Plan, *, timeout_s: float | None = None) -> Measurement:
        return self._run(_Task("plan", plan=plan.to_dict()), timeout_s)

    def all_reduce_seconds(self, nbytes: int, *, timeout_s: float | None = None) -> float:
        """Seconds one all-reduce of ``nbytes`` takes between this runner's ranks (the
        median of a few, the slowest rank's); the link the trials' gradients cross."""
        if self.world_size == 1:
            raise TunerError("all_reduce_seconds needs a runner with world_size > 1.")
        return max(self._exchange(_Task("link", nbytes=nbytes), timeout_s))

    def curve(self, plan: Plan, steps: int, *, timeout_s: float | None = None
              ) -> list[float]:  # fmt: skip
        runs = self._exchange(_Task("curve", plan=plan.to_dict(), steps=steps), timeout_s)
        return [sum(losses) / len(losses) for losses in zip(*runs, strict=True)]

    def _run(self, task: _Task, timeout_s: float | None) -> Measurement:
        return combine_ranks(self._exchange(task, timeout_s))

    def _exchange(self, task: _Task, timeout_s: float | None) -> list[Any]:
        """Send ``task`` to every rank; their payloads in rank order."""
        if not self._ranks:
            self._start()
        try:
            for worker in self._ranks:
                worker.send(task)
            replies = self._gather(timeout_s, what="trial")
        except BaseException:  # a death, the time limit, Ctrl-C: no worker outlives it
            self._stop()
            raise
        failed = [payload for status, payload in replies if status != "ok"]
        if failed:
            self._stop()  # an exception leaves the workers' state untrusted
            raise TrialFailed(failed[0]["reason"], kind=failed[0]["kind"])
        return [payload for _, payload in replies]

    def _start(self) -> None:
        port = _free_port() if self.world_size > 1 else 0
        threads = _threads_per_rank(self.world_size)
        try:
            for rank in range(self.world_size):
                worker = _Worker()
                self._ranks.append(worker)
                net = self._network
                worker.start({**self._init, "rank": rank, "master_port": port}, threads,
                             prefix=net.prefixes[rank] if net else (),
                             ifname=net.ifnames[rank] if net else None)
            self.started += 1
            replies = self._gather(self._start_timeout_s, what="start-up")
        except BaseException:
            self._stop()
            raise
        failed = [payload for status, payload in replies if status != "ready"]
        if failed:
            self._stop()
            raise TunerError(f"the tuner's worker process could not load the workload: "
                             f"{failed[0]['reason']}")

    def _gather(self, timeout_s: float | None, *, what: str) -> list[Any]:
        """One reply from every rank, in rank order; raises TrialFailed as soon as one rank
        dies or errs (the others would wait on it in a collective forever) or at the limit."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        replies: dict[int, Any] = {}
        while len(replies) < len(self._ranks):
            for rank, worker in enumerate(self._ranks):
                if rank in replies:
                    continue
                reply = worker.poll()
                if reply is not None:
                    replies[rank] = reply
                    if reply[0] not in ("ok", "ready"):
                        self._blame_a_death()
                        return [reply]
            if len(replies) == len(self._ranks):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TrialFailed(f"timed out: no result within the {what} time limit of "
                                  f"{timeout_s:.0f} s (the worker was killed)", kind="timeout")
            time.sleep(0.02)
        return [replies[r] for r in range(len(self._ranks))]

    def _blame_a_death(self, grace_s: float = 2.0) -> None:
        """Raise the death of a rank that died just before another reported an error.

        A rank that crashes makes its peers' collectives fail ("connection closed by
        peer"); the crash, not the peer's error, is the trial's reason.
        """
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for worker in self._ranks:
                if worker.died():
                    worker.poll()  # raises the death's TrialFailed
            time.sleep(0.05)

    def _stop(self) -> None:
        for worker in self._ranks:
            worker.stop()
        self._ranks = []

    def close(self) -> None:
        self._stop()


class _Worker:
    """One worker process and its socket; ``poll`` returns its reply, or raises TrialFailed
    when it died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._log: Any = None

    def start(self, init: dict[str, Any], threads: int | None, *,
              prefix: tuple[str, ...] = (), ifname: str | None = None) -> None:
        parent, child = socket.socketpair()
        # Closed in stop(), which every path out of a worker goes through.
        self._log = tempfile.TemporaryFile(prefix="autoscale-worker-")  # noqa: SIM115
        code = ("import sys; sys.path.pop(0); "
                "from autoscale.search._workers import worker_main; worker_main()")
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        if ifname is not None:
            env["GLOO_SOCKET_IFNAME"] = ifname
        try:
            self._proc = subprocess.Popen(
                [*prefix, sys.executable, "-c", code, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                start_new_session=True, env=env)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._conn.send(init)

    def send(self, task: _Task) -> None:
        assert self._conn is not None
        self._conn.send(task)

    def poll(self) -> Any:
        """The worker's reply if one is waiting, else None; TrialFailed if it died."""
        assert self._conn is not None and self._proc is not None
        if self._conn.poll(0):
            try:
                return self._conn.recv()
            except (EOFError, OSError):
                pass
        elif self._proc.poll() is None:
            return None
        self._proc.wait()
        raise _death(self._proc.returncode, self._log_tail())

    def died(self) -> bool:
        """The process ended by a signal or a failing exit status (a worker that reported
        an error returns with status 0)."""
        return self._proc is not None and self._proc.poll() not in (None, 0)

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [ln.strip() for ln in self._log.read().decode(errors="replace").splitlines()]
        useful = [ln for ln in lines if ln and not ln.startswith(("File ", "Current thread",
                                                                 "Thread 0x", "Extension"))]
        return useful[0][:160] if useful else ""

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def combine_ranks(runs: list[Measurement]) -> Measurement:
    """One measurement of an N-rank step from each rank's: see Note: [multi-rank trials]."""
    if len(runs) == 1:
        return runs[0]
    slowest = max(runs, key=lambda m: m.step_time_s)
    total = sum(m.batch_size for m in runs)
    comm = [m.comm_bytes_per_step for m in runs if m.comm_bytes_per_step is not None]
    return dataclasses.replace(
        slowest, batch_size=total, samples_per_s=total / slowest.step_time_s,
        peak_memory_bytes=max(m.peak_memory_bytes for m in runs),
        baseline_bytes=max(m.baseline_bytes for m in runs),
        comm_bytes_per_step=max(comm) if comm else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _threads_per_rank(world_size: int) -> int | None:
    """OpenMP threads for each rank: the cores shared out, so N ranks do not oversubscribe
    the machine (torch would give each rank every core); None keeps the user's setting."""
    if world_size == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // world_size)


def _death(code: int | None, log_tail: str) -> TrialFailed:
    detail = f" ({log_tail})" if log_tail else ""
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        if sig == signal.SIGKILL:
            return TrialFailed(f"the worker was killed by SIGKILL, most likely by the OS "
                               f"out-of-memory killer{detail}", kind="oom")
        return TrialFailed(f"the worker crashed: {sig.name}{detail}", kind="crash")
    return TrialFailed(f"the worker exited with status {code}{detail}", kind="crash")


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _kind(err: BaseException) -> str:
    return "oom" if isinstance(err, torch.OutOfMemoryError | MemoryError) else "error"


# -- the worker side ------------------------------------------------------------------

def worker_main() -> None:
    """Entry point of a worker process: load the workload, then serve tasks until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    conn = Connection(int(sys.argv[1]))
    init = conn.recv()
    for entry in init["sys_path"]:  # after autoscale's own imports: it cannot be shadowed
        if entry and entry not in sys.path:
            sys.path.append(entry)
    try:
        state = _WorkerState.load(init)
    except Exception as err:
        conn.send(("failed", {"reason": _describe(err)}))
        return
    from autoscale.search._trial import freeze_long_lived, thaw

    # The worker's long-lived state is built: its trials' collections skip it from here.
    # Thawed on the way out: objects still frozen at interpreter exit are never finalized,
    # and nanobind (triton's bindings) prints a leak report for each of its own.
    froze = freeze_long_lived()
    try:
        _serve(conn, state)
    finally:
        thaw(froze)


def _serve(conn: Connection, state: _WorkerState) -> None:
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", state.run(task)))
        except Exception as err:
            conn.send(("error", {"reason": _describe(err), "kind": _kind(err)}))
            return


@dataclass
class _WorkerState:
    model: nn.Module
    batch: Batch
    loss_fn: LossFn | None
    graph: Any
    device: torch.device
    warmup: int
    iters: int

    @classmethod
    def load(cls, init: dict[str, Any]) -> _WorkerState:
        from autoscale.capture import capture
        from autoscale.plan import Fingerprint, Plan
        from autoscale.runtime._batch import rank_share

        device = _join_ranks(init)
        source = WorkloadSource(**init["source"])
        if source.kind == "script":
            from autoscale.search._workload import load_workload

            work = load_workload(source.path)
            model, batch, loss_fn = work.model, work.example_inputs, work.loss_fn
        else:
            saved = torch.load(source.path, map_location="cpu", weights_only=False)
            model, batch, loss_fn = saved["model"], saved["batch"], saved["loss_fn"]
        graph = capture(model, batch)
        digest = Plan(fingerprint=Fingerprint.of(model, graph.structure_hash())
                      ).fingerprint_digest()
        if digest != init["fingerprint"]:
            raise TunerError(
                f"the worker built a different model (fingerprint {digest}) than the tuner "
                f"({init['fingerprint']}); build() must return the same architecture on "
                "every call.")
        model.to("cpu")  # the pristine copy: each trial moves its own copy to the device
        # The graph stays the global batch's (the plan's and the cost model's reference);
        # each rank trains on its own rows of it.
        share = rank_share(batch, init["rank"], init["world_size"])
        return cls(model, share, loss_fn, graph, device, init["warmup"], init["iters"])

    def run(self, task: _Task) -> Measurement | float | list[float]:
        from autoscale.plan._fields import from_json_dataclass
        from autoscale.search._trial import measure_baseline, measure_plan, time_all_reduce

        if task.kind == "link":
            return time_all_reduce(task.nbytes, device=self.device)
        if task.kind == "curve":
            from autoscale.search._trial import loss_curve

            return loss_curve(Plan.from_dict(task.plan), self.model, self.batch,
                              loss_fn=self.loss_fn, graph=self.graph, steps=task.steps,
                              device=self.device)
        if task.kind == "baseline":
            optimizer = from_json_dataclass(OptimizerPlan, task.optimizer, "optimizer")
            return measure_baseline(self.model, self.batch, loss_fn=self.loss_fn,
                                    optimizer=optimizer, warmup=self.warmup,
                                    iters=self.iters, device=self.device)
        return measure_plan(Plan.from_dict(task.plan), self.model, self.batch,
                            loss_fn=self.loss_fn, graph=self.graph, warmup=self.warmup,
                            iters=self.iters, device=self.device)


def _join_ranks(init: dict[str, Any]) -> torch.device:
    """Join the trial's process group (N > 1 ranks) and return this rank's device: gloo on
    CPU, NCCL with one GPU per rank on CUDA."""
    device = torch.device(init["device"])
    world, rank = init["world_size"], init["rank"]
    if world == 1:
        return device
    import datetime

    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://{init['master_addr']}:{init['master_port']}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=_START_TIMEOUT_S))
    return device


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the tuner dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the tuner died before prctl took effect
            os._exit(1)

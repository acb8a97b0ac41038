"""The search: an Optuna study over the plan space, with measured trials isolated.

``_study`` holds the search space and the study loop (the cost model prunes first);
``_workers`` runs every measured trial in a worker process with a time limit, so a
crash, hang or out-of-memory fails that trial only; ``_workload`` loads the user's
workload script, which is also how a worker gets the model back.
"""

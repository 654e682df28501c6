"""Where graphopt's work outgrows one machine: measurements on boards behind TVM's RPC tracker (rpc.py,
graphopt.RPC), and tasks on Ray (ray_cluster.py, graphopt.Ray): the joint planner's candidate evaluations
(ray_eval.py) and MetaSchedule's candidate builds (ray_build.py)."""


def first_line(e: BaseException) -> str:
    """A remote failure in one line for a report: the last line of its message that is not traceback."""
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("Traceback", "  "))]
    return (lines[-1] if lines else type(e).__name__)[:200]

"""Where graphopt's work outgrows one machine: measurements on boards behind TVM's RPC tracker (rpc.py,
graphopt.RPC) and the joint planner's candidate evaluations as Ray tasks (ray_eval.py, graphopt.Ray)."""

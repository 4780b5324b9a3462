"""The default CPU schedule rules, one per module, each `apply(func, target) -> s_tir.Schedule | None`
(None: not its kind of function); schedules/cpu_default.py lists them in the order it tries them."""

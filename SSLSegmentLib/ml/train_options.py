"""The trainer's named choices, without torch: `TrainConfig` (ml/trainer.py) gives them their meaning, and the
backend's retrain settings (training/retrain.py) are checked against the same names before any job exists."""

LR_SCHEDULES = ("constant", "step", "poly")
EVAL_MODELS = ("student", "teacher")

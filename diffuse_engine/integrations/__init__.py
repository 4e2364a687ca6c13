"""Integrations with other tools: :mod:`.lm_eval` (the lm-evaluation-harness model ``diffuse-engine`` and the
shipped tasks in ``lm_eval_tasks/``). Each is imported on demand, only when its tool is installed."""

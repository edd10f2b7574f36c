"""Evaluations of trained models beyond rotalibi's own extrapolation study: the
lm-evaluation-harness on Hugging Face exports (`evaluation.harness`, run by `launch.lm_eval`)
and its local task."""

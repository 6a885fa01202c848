"""R1's post-training on duet's engine (DeepSeek-R1: cold-start SFT, GRPO on verifiable rewards,
distillation). Read in this order: tasks.py (problems and verifiers), rewards.py (plain reward
functions), sft.py (template, rows, masked loss), rollout.py (sampling, log-probs), grpo.py
(objective and step), replay.py (MoE routing record/replay), learner.py (a model on the layout
and its optimizer step), distill.py, driver.py (the stages `duet-r1` runs)."""

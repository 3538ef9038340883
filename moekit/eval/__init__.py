"""Evaluation: benchmark tasks (loglikelihood, PPL and GEN modes, rolling perplexity), the lm-evaluation-harness
adapter, benchmark-leakage detection and router statistics, all scored through the serving engine."""

"""Evaluation: ``safesteer eval`` (:mod:`safesteer.evaluate.harness`) and the before/after refusal
check that ``safesteer run`` ends with (:mod:`safesteer.evaluate.check`).

Re-exports nothing: importing a light submodule (the options in :mod:`safesteer.evaluate.config`,
the benchmark registry) must not import torch, so ``--help`` stays fast.
"""

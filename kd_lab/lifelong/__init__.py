"""Lifelong learning: a sequence of tasks learned one after another, and Learning without Forgetting.

Li & Hoiem, "Learning without Forgetting" (ECCV 2016 / TPAMI 2017, arXiv:1606.09282). The student learns
task t with the model it had after task t-1 as its own teacher: the old heads' outputs on task t's inputs
are distilled, so the old tasks are kept without their data.

The package is small and self-contained: ``tasks`` (the class split), ``model`` (a shared trunk and one head
per task), ``loss`` (the LwF objective), ``metrics`` (average accuracy and forgetting), ``config`` (the checks
before compute), ``loop`` (the sequence) and ``app`` (the ``kd-lab-lifelong`` command). docs/lifelong.md
describes the protocol.
"""

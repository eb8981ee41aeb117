"""Knowledge-distillation comparison, by concern:

- kd.methods: the `Distiller` base, one file per method (its loss, settings, report sentence ...), the
  registry and the helpers several methods share;
- kd.engine: the one training loop, evaluation, device and precision, checkpoints, torch.distributed;
- kd.data: the image folder, decoding, and the batches every method sees alike;
- kd.results: the run record, metrics, the comparison table, result files, plots and report.md;
- kd.experiment: the orchestration: config, setup, plan, teacher, the runs, the estimate, --parallel runs,
  resume, logging and how the command ends.
"""

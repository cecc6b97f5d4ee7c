"""Orchestration of experiments, one job per module.

- `configurations`: the paper's training configurations as run configs;
- `datasets`: datasets, catalogs, data specs; `banks`: projection banks;
- `runs`: training one run; `evaluation`: scoring networks on images;
- `workdir`: build-once locks and run claims of a shared work directory; `launch`: where the
  runs train (local workers, submitit, commands); `sweeps`: sweeps declared in config files;
- `study`: the xeno-learning study; `report`: its report.
"""

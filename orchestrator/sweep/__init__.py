"""Sweeps: a grid of training runs from one command (`orchestrator sweep`), locally or as one Slurm job array.

    orchestrator sweep --run-dir runs/ablation model.name=danet18,danet34 model.connection=spiking,sew_add,da
    orchestrator sweep --nodes 4 --gpus-per-node 8 --max-parallel 2 --run-dir runs/ablation ...
    orchestrator sweep status runs/ablation

``axes`` parses ``key=a,b,c`` and names runs; ``spec`` expands and validates; ``state`` is DIR/sweep.json;
``parent`` the MLflow parent run; ``local`` and ``array`` run the sweep; ``status`` refreshes and prints it;
``finish`` logs the comparison figures and ends the parent run.
"""

from .axes import Axis, expand, parse_overrides, run_name, split_values, unique_names
from .command import launch_sweep
from .status import show

__all__ = ["Axis", "expand", "launch_sweep", "parse_overrides", "run_name", "show", "split_values",
           "unique_names"]

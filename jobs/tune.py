"""Sweep learning rate and warmup as a Ray job: `raylm tune` with its settings in a YAML file.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_tiny_cpu.yaml
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_tiny_cpu.yaml \
        --data_dir /mnt/raylm/processed_data --save_dir /mnt/raylm/sweeps/tiny --num_samples 4 --max_steps 400
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune_tiny_cpu.yaml --resume

Takes exactly the flags of `raylm tune` (the search settings and every `raylm train` flag; `python
jobs/tune.py --help` lists them); flags override the file. `data_dir` and `save_dir` must be paths every
node sees. This script holds no logic: it parses the config and calls one raylm function.
"""
import sys

from raylm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))

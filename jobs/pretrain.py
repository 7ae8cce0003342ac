"""Pre-train a model as a Ray job: `raylm train` with its settings in a YAML file.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/multi_node.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/tiny_cpu.yaml \
        --data_dir /mnt/raylm/processed_data --save_dir /mnt/raylm/checkpoints/tiny --max_steps 200

Any `raylm train` flag may follow the file and overrides it (`python jobs/pretrain.py --help`
lists them). The job's driver runs on the head node and the training workers wherever the cluster
has room, so `data_dir` and `save_dir` must be paths every node sees (a shared file system) or
s3:// / gs:// URIs; see cluster/README.md. This script holds no logic: it parses the config and
calls one raylm function.
"""
import sys

from raylm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))

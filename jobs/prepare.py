"""`raylm prepare` as a Ray job: raw text files -> tokenizer + packed Parquet rows.

    ray job submit --working-dir . -- python jobs/prepare.py --input_dir s3://bucket/raw --output_dir /shared/processed_data
    python jobs/prepare.py --input_dir ./raw_text_data --output_dir ./processed_data --num_workers 8

Takes exactly the flags of `raylm prepare` (`--config FILE.yaml` sets any of them; flags override it).
"""
import sys

from raylm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))

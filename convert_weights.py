#!/usr/bin/env python3
"""Convert ELMo weights between the published HDF5 layout and an orbax checkpoint (same as `elmo-jax convert`).

    python convert_weights.py --options options.json --weights weights.hdf5 --checkpoint ckpt_dir
    python convert_weights.py --to hdf5 --checkpoint ckpt_dir --weights out.hdf5 --options out.json
"""

import sys

from elmo_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

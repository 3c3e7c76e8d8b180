"""The keys of a training sample / batch (a dict of tensors), named once for the views, the dataset and the methods.

Made by the views (:class:`pirl.data.views.PirlViews`, :class:`pirl.data.batched.BatchedViews`):

* ``IMAGE`` (B, 3, S, S): the image view I (absent when a method does not use it);
* ``PATCHES`` (B, grid^2, 3, P, P) and ``ORDER`` (B, grid^2), the cell of each patch: the jigsaw view I^t;
* ``PERMUTATION`` (B,): the row of the permutation set that shuffled the patches (covariant Jigsaw);
* ``ROTATION`` (B,): turns by 90 degrees; ``ROTATED`` (B, 3, S, S): the turned image view.

Added by :class:`pirl.data.dataset.ViewDataset`: ``INDEX`` (the sample's row in the bank), ``LABEL`` (-1 when
unlabelled) and ``BAD`` (undecodable indices skipped for it, padded with -1). With batched views the DataLoader
yields ``IMAGE`` as decoded uint8 and ``SIZE`` (the (h, w) holding the image, :class:`pirl.data.batched.DecodeResize`).
"""

IMAGE = "image"
PATCHES = "patches"
ORDER = "order"
PERMUTATION = "permutation"
ROTATION = "rotation"
ROTATED = "rotated"
INDEX = "index"
LABEL = "label"
BAD = "bad"
SIZE = "size"

__all__ = ["BAD", "IMAGE", "INDEX", "LABEL", "ORDER", "PATCHES", "PERMUTATION", "ROTATED", "ROTATION", "SIZE"]

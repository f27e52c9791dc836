"""trunet: time-resolved (4D) cardiac cine MRI segmentation.

Subpackages:
    models      ConvLSTM cells and the time-resolved UNet3D.
    transforms  4D readers and MONAI transform chains.
    pipeline    config, datasets, training, inference, evaluation, planning, tracking.
    data        the built-in synthetic 4D cardiac phantom.
"""

__version__ = "0.1.0"

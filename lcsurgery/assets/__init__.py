"""Files shipped with the package: a ResNet-20 pretrained on the built-in shapes task.

``resnet20_shapes.pt`` (a plain ``state_dict`` of ``cifar:resnet20``, ~1 MB) lets ``lcsurgery demo``
retrofit a *pretrained* model with no network and no ``../shared``. It was made with::

    lcsurgery finetune --dense --model cifar:resnet20 --data synthetic:10000 --epochs 8 \\
        --lr 0.1 --out runs/shapes-r20
    cp runs/shapes-r20/model.pt lcsurgery/assets/resnet20_shapes.pt
"""

from pathlib import Path

SHAPES_RESNET20 = Path(__file__).with_name("resnet20_shapes.pt")

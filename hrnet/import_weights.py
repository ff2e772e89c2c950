"""``hrnet import-weights``: an official HRNet-Image-Classification or timm PyTorch checkpoint
as a TensorFlow weight file (hrnet.weights.import_torch).

Apart from hrnet.weights so that ``hrnet import-weights --help`` starts without TensorFlow.
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="config name or alias (w18, w18_small_v1, hrnet_w18, ...)")
    parser.add_argument("--torch-checkpoint", required=True, metavar="FILE.pth",
                        help="official HRNet-Image-Classification or timm state_dict")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the TF weight file")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="re-initialize the classifier for K classes (fine-tuning); default: the checkpoint's")


def run(args) -> int:
    from hrnet.weights import import_torch

    m = import_torch(args.model, args.torch_checkpoint, args.output, args.num_classes)
    print("wrote %s/weights (%s, %d classes, %s params, classifier %s)"
          % (args.output, m["model"], m["num_classes"], "{:,}".format(m["params"]), m["classifier"]))
    return 0


"""``hrnet info``: parameter count, GMACs and a per-stage summary of a model.

Apart from hrnet.model.summary so that ``hrnet info --help`` starts without TensorFlow.
"""


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="w18",
                        help="config name or alias (w18_small_v1 ... w64, w18_s4, w30_s4), or a YAML file")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--size", type=int, nargs="+", default=[224], metavar="PX",
                        help="input size: one number (square) or height and width, multiples of 32")


def run(args) -> int:
    from hrnet import configs
    from hrnet.model.hrnet import build_model, check_input_size
    from hrnet.model.summary import count_macs, count_params, summarize

    config = configs.load(args.model)  # a name, an alias or a YAML file
    name = config["name"]
    size = tuple(args.size) * 2 if len(args.size) == 1 else tuple(args.size)
    check_input_size(size)
    model = build_model(config, num_classes=args.num_classes, input_size=size)
    macs = count_macs(model)
    print("model        hrnet_%s (%d classes, input %dx%d)" % (name, args.num_classes, size[0], size[1]))
    print(f"params       {count_params(model):,}")
    print("GMACs        %.3f   (conv + dense multiply-adds / 1024^3, the official 'GFLOPs')" % (macs / 1024 ** 3))
    print()
    print("\n".join(summarize(model)))
    return 0

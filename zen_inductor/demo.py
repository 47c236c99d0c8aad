"""The main job: a small Llama, quantized, compiled three ways, timed. Filled in below."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("demo not built yet")

"""`python -m ecprune_onnx`: the same command line as the `ecprune-onnx` script."""

from ecprune_onnx.cli import main

if __name__ == "__main__":
    main()

"""`python -m framepack_turbo ...` is the `framepack` command (how torchrun and `--gpus` start each rank)."""

from framepack_turbo.cli import main

if __name__ == "__main__":
    main()

"""`python -m habit`: what torchrun and `accelerate launch -m` run."""

from habit.cli import main

raise SystemExit(main())

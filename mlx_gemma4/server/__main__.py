"""`python -m mlx_gemma4.server` = `mlx-gemma4-server` (the command line is in mlx_gemma4.cli)."""

from mlx_gemma4.cli import server_main

raise SystemExit(server_main())

"""The lowest floor: standard-library helpers every package may import (models/, privacy/, contract/,
client/, server/, study/). Nothing here imports a project package; the one third-party library is rich,
imported only where progress.py draws a bar on a terminal."""

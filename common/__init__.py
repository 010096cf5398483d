"""The lowest floor: standard-library helpers every package may import (models/, privacy/, contract/,
client/, server/, study/). Nothing here imports a project package or a third-party library."""

"""What every package of the project builds on and nothing stage-specific: files written
atomically and checkpoints loaded weights-only (:mod:`.files`; each format is named by its owner),
and frozen dataclass configs built from plain data with one-line errors (:mod:`.configs`).
Imports torch and the standard library only."""

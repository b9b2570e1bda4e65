"""Disk mirrors, in both live engines: how fast each may go for the task's budget (``speeds``: real bytes,
each job's speed from the source's allocation map), the one pacer that turns each tick's job figures into
progress, shares and next speeds (``pacer``), the judgement of a disk the guest writes faster than its share
(``hotdisk``) and the guest's write rate when a copy starts (``guestwrites``)."""

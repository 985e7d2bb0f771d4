"""The ground floor: checkpoint reading and writing, staged output folders, row chunks, the I/O
thread, output records, devices and user-facing errors, shared by merging, AIM, calibration,
evaluation and the studies. It imports nothing else of this project."""

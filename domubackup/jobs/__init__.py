"""The jobs: the executor that runs any plan, the job frame, and the backup (verify, fsck),
seed and freeze jobs with the checks and decisions their plans name."""

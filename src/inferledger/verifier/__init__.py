"""A dispute juror: the verdict on one disputed checkpoint (``judge``) and the staked
service that takes evidence, judges and relays signed verdicts (``service``)."""

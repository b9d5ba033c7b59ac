"""The analytic ELS score machines (Kamb & Ganguli): the machine, its patch-size schedule, calibration and sampling."""

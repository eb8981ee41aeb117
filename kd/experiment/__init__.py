"""The orchestration of an experiment: config validation (config), what every run shares (setup), the plan
(plan), the teacher (teacher), one seed's runs (runs), the time estimate (estimate), --parallel runs
(sweep), resuming (resume), logging (logs) and how the command ends (launch)."""

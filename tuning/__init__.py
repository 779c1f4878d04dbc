"""The sweep over the settings that trade copying against quality (`memshard tune`): the search space
(`space`; one point's measurement is `evaluation.curve_point`), the choice at a quality budget (`choice`), the report
(`report`: table, picture, chosen config), a trial as it runs in a Ray Tune worker (`trial`) and the
sweep's driver with its MLflow runs (`sweep`); and the efficacy bench's curves read against the same
budget (`curves`)."""

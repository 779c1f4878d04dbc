"""The sweep over the settings that trade copying against quality (`memshard tune`): the search space
(`space`), one point's measurement (`measure`), the choice at a quality budget (`choice`), the report
(`report`: table, picture, chosen config) and the Ray Tune sweep with its MLflow runs (`sweep`)."""

"""The wind farm simulator: sensor streams for a farm of turbines and a web dashboard.

``simulator.generator`` is the pure-numpy stream generator (stable API, used by
training and evaluation). The simulator reaches device processes only through
MQTT and ``edgeagent.client``.
"""

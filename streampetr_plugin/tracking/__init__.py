"""3D multi-object tracking on the streaming detector's output (docs/tracking.md).

* :mod:`~streampetr_plugin.tracking.frame` - what a tracker sees of a frame (:class:`TrackingFrame`) and the
  :class:`Tracker` protocol every registered tracker follows;
* :mod:`~streampetr_plugin.tracking.association` - greedy, velocity-compensated centre-distance matching;
* :mod:`~streampetr_plugin.tracking.tracks` - track life cycle (birth by score, death by age) and the shared
  options;
* :mod:`~streampetr_plugin.tracking.centerpoint` - the CenterPoint tracker (``centerpoint``);
* :mod:`~streampetr_plugin.tracking.query_propagation` - track ids that follow the propagated queries
  (``query_propagation``);
* :mod:`~streampetr_plugin.tracking.build` - the recipe's tracker from the ``trackers`` registry.
"""
from streampetr_plugin.tracking.frame import NOT_TRACKED, Tracker, TrackingFrame

__all__ = ["NOT_TRACKED", "Tracker", "TrackingFrame"]

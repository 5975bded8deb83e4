"""The older ``jax_sgmc`` API's ``scheduler`` module, as far as saving needs it.

Code written for ``jax_sgmc.io`` calls ``io.scheduler.static_information(...)``;
with ``import jaxsave as io`` that is this module. ``static_information`` is
:class:`jaxsave.static_information` itself, a named tuple with the one field
``samples_collected`` (positional or by name); it may also be left out (``None``:
the count is unknown), which the old module did not allow.

>>> import jaxsave
>>> jaxsave.scheduler.static_information(samples_collected=10)
static_information(samples_collected=10)
>>> jaxsave.scheduler.static_information is jaxsave.static_information
True
"""

from jaxsave._stream.state import static_information

__all__ = ["static_information"]

"""A ZooKeeper write-back batch (``zk_claim.ZkClaims.restore_many``): one node's error leaves
that key to the agent's reconcile and the others go on; the connection's or the ensemble's
errors end the call, which is tried again whole."""

from __future__ import annotations

import pytest
from kazoo.exceptions import ConnectionLoss, NoAuthError, NoNodeError, ThrottledOpError

from discovery.errors import RegistryError
from discovery.model import Instance
from discovery.registry.zk_claim import _alone

INST = Instance(service="web", id="n1:000000000001:80", node="n1", address="127.0.0.1",
                port=80)


@pytest.mark.parametrize("error", [NoAuthError(), NoNodeError(), RegistryError("keeps changing")])
def test_a_nodes_own_error_ends_only_its_key_in_a_batch(error: Exception) -> None:
    with _alone(INST, batch=True):  # logged: the batch goes on
        raise error
    with pytest.raises(type(error)), _alone(INST, batch=False):  # alone: raised, as before
        raise error


@pytest.mark.parametrize("error", [ConnectionLoss(), ThrottledOpError()])
def test_the_connections_or_the_ensembles_error_ends_the_batch(error: Exception) -> None:
    with pytest.raises(type(error)), _alone(INST, batch=True):
        raise error

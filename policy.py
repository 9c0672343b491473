"""Who may do what: one policy for the whole network.

Every route declares the action it performs beside its view (`@serves(Action.RECORD)` in app.py), and a
node asks `may(role, action)` before it serves one. The network's own checks ask the same table whether the
member that signed a transaction may make it, so a node tricked into gossiping a record is refused by every
honest node, not only by its own routes.
"""
from __future__ import annotations

from enum import Enum


class Action(str, Enum):
    READ = "read"          # the chain, its validity, record lookups, syncing by hand
    FETCH = "fetch"        # fetch a record from IPFS, decrypt a file
    RECORD = "record"      # add a file to IPFS, encrypt one, record a transaction: the paper's patient
    MINE = "mine"          # mine the pending transactions into a block
    ADMIT = "admit"        # admit a member to a signed network, or remove one: a healthcare authority
    GRANT = "grant"        # grant or revoke access to one's own records: a patient
    CONNECT = "connect"    # link this node to peers
    GOSSIP = "gossip"      # node to node: a peer's transaction or block (its content is checked, not its route)
    DESCRIBE = "describe"  # the API's own description
    HEALTH = "health"      # liveness, for monitors
    PAGE = "page"          # the node's web page and its own files (static: no data in them, the API holds it)


PATIENT = "patient"
HEALTHCARE_AUTHORITY = "healthcare_authority"
HEALTHCARE_PROVIDER = "healthcare_provider"
ROLES = (PATIENT, HEALTHCARE_AUTHORITY, HEALTHCARE_PROVIDER)
ROLE_ALIASES = {"healthcare": HEALTHCARE_AUTHORITY, "authority": HEALTHCARE_AUTHORITY,
                "provider": HEALTHCARE_PROVIDER, "doctor": HEALTHCARE_PROVIDER}

EVERY_ROLE = frozenset({Action.GOSSIP, Action.DESCRIBE, Action.HEALTH, Action.PAGE})
CARE_ROLE = EVERY_ROLE | {Action.READ, Action.FETCH, Action.MINE, Action.CONNECT}
ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    PATIENT: CARE_ROLE | {Action.RECORD, Action.GRANT},
    HEALTHCARE_AUTHORITY: CARE_ROLE | {Action.ADMIT},
    HEALTHCARE_PROVIDER: CARE_ROLE,
}
# Actions served without the network's API key: a monitor needs no secret to ask whether a node is up, and a
# browser cannot send a header when it opens the page: the page asks for the key and sends it on each API call.
OPEN_ACTIONS = frozenset({Action.HEALTH, Action.PAGE})


def canonical_role(role: str) -> str:
    """"provider" -> "healthcare_provider"; a role of the operator's own passes through."""
    return ROLE_ALIASES.get(role, role)


def may(role: str, action: Action) -> bool:
    """Whether a node (or member) of `role` may perform `action`.

    A role the operator defined without a row here is trusted with everything, as before roles existed.
    """
    allowed = ROLE_ACTIONS.get(canonical_role(role))
    return allowed is None or action in allowed


def needs_key(action: Action) -> bool:
    return action not in OPEN_ACTIONS

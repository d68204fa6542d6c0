"""What every part shares: the instance record, the catalog built from records, and the
validators and duration parser for every value that comes from outside."""

from discovery.model.instance import SCHEMA_VERSION, Instance, State, id_node, make_instance_id

__all__ = ["SCHEMA_VERSION", "Instance", "State", "id_node", "make_instance_id"]

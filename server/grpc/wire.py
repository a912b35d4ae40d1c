"""The generated protobuf modules under short names; regenerate them with ``make protos``."""

from server.generated.yayi.serving.v1 import inference_pb2 as pb
from server.generated.yayi.serving.v1 import inference_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name

__all__ = ["pb", "pb_grpc", "SERVICE_NAME"]

"""Exit 0 only when yayi-serve's grpc.health.v1 service answers SERVING.

Docker's HEALTHCHECK has no gRPC probe (Kubernetes does: deploy/k8s uses that instead),
so the compose healthcheck runs this with the image's own Python and grpcio.
Usage: python healthcheck.py [HOST:PORT] [SERVICE]   (default localhost:50051, overall health)
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str = "localhost:50051", service: str = "") -> int:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    except grpc.RpcError as error:
        print(f"{target}: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(check(*sys.argv[1:3]))

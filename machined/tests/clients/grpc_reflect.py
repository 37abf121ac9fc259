"""A gRPC client that is not Plinth's own (Python grpcio): lists the node's services by server
reflection, builds the Machine service's messages from the descriptors the node serves (no
copy of the proto here), calls Version with them, and asks the standard health service.

Usage: grpc_reflect.py ENDPOINT CA CERT KEY
Prints one line per finding: `service NAME`, `version VERSION SLOT`, `health NAME STATUS`.
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    endpoint, ca, cert, key = sys.argv[1:5]
    read = lambda p: open(p, "rb").read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )
    channel = grpc.secure_channel(endpoint, creds)

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for reply in stub.ServerReflectionInfo(iter([request]), timeout=20):
        for s in reply.list_services_response.service:
            print("service", s.name)

    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("plinth.machine.v1.Machine")
    method = service.FindMethodByName("Version")
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/plinth.machine.v1.Machine/Version",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=reply_class.FromString,
    )
    v = call(request_class(), timeout=20)
    print("version", v.version, v.slot)

    health = health_pb2_grpc.HealthStub(channel)
    for name in ["", "plinth.machine.v1.Machine"]:
        r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=20)
        print("health", name or "(server)", health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


if __name__ == "__main__":
    main()

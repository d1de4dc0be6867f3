from twisted.application.service import ServiceMaker

gateway = ServiceMaker(
    "gateway",
    "gateway.tap",
    "Private network connector: a service node, a connector, or both, from a TOML file.",
    "gateway",
)

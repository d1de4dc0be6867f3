from twisted.application.service import ServiceMaker

gateway_updater = ServiceMaker(
    "gateway-updater",
    "gateway.updater.tap",
    "Supervises a connector and updates it from the service's signed releases, with rollback.",
    "gateway-updater",
)

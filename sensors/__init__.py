"""Sensor adapters: BLE wearables, MQTT room sensors, replay of recordings."""

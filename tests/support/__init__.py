"""Test support code shared by several test packages (throwaway servers, free ports)."""

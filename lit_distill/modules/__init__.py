"""LightningModules, one algorithm per file."""
from lit_distill.modules.agent import AgentModule
from lit_distill.modules.distill import DistillModule
from lit_distill.modules.dpo import DPOModule
from lit_distill.modules.grpo import GRPOModule
from lit_distill.modules.online_dpo import OnlineDPOModule
from lit_distill.modules.ppo import PPOModule
from lit_distill.modules.reward import RewardModule, load_reward_model
from lit_distill.modules.sft import SFTModule

__all__ = ["AgentModule", "DPOModule", "DistillModule", "GRPOModule", "OnlineDPOModule", "PPOModule", "RewardModule",
           "SFTModule", "load_reward_model"]
